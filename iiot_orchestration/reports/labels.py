"""Words and number, date and period formats of the reports in each tenant locale (pt_BR, en)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime

LOCALES = ("pt_BR", "en")
NO_VALUE = "\u2013"  # an en dash: no previous period, no share

_PT_MONTHS = (
    "janeiro",
    "fevereiro",
    "março",
    "abril",
    "maio",
    "junho",
    "julho",
    "agosto",
    "setembro",
    "outubro",
    "novembro",
    "dezembro",
)
_EN_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


@dataclass(frozen=True)
class Labels:
    """Every word a report shows, and how it writes numbers and dates, for one locale."""

    locale: str
    decimal: str
    thousands: str
    date_format: str  # strftime
    excel_date_format: str
    months: tuple[str, ...]
    words: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.words[key]

    def kind(self, meter_kind: str) -> str:
        return self.words.get(f"kind_{meter_kind}", meter_kind)

    def status(self, status: str) -> str:
        return self.words.get(f"status_{status}", status)

    def number(self, value: float | None, decimals: int = 3) -> str:
        """``1.234,567`` (pt_BR) or ``1,234.567`` (en); a dash for no value."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return NO_VALUE
        text = f"{value:,.{decimals}f}"
        return text.translate(str.maketrans({",": self.thousands, ".": self.decimal}))

    def percent(self, ratio: float | None, decimals: int = 1, signed: bool = False) -> str:
        if ratio is None:
            return NO_VALUE
        text = self.number(abs(ratio) * 100, decimals)
        sign = ("+" if ratio > 0 else "-" if ratio < 0 else "") if signed else ""
        return f"{sign}{text} %" if self.locale == "pt_BR" else f"{sign}{text}%"

    def day(self, value: date) -> str:
        return value.strftime(self.date_format)

    def timestamp(self, value: datetime) -> str:
        zone = getattr(value.tzinfo, "key", None) or value.tzname()
        return f"{value.strftime(self.date_format)} {value:%H:%M} ({zone})"

    def month(self, value: date) -> str:
        name = self.months[value.month - 1]
        return f"{name} de {value.year}" if self.locale == "pt_BR" else f"{name} {value.year}"

    def page(self, number: int, total: int) -> str:
        return self.words["page_of"].format(number=number, total=total)


_WORDS_EN = {
    "title": "Consumption report",
    "tenant": "Tenant",
    "period": "Period",
    "timezone": "Time zone",
    "generated": "Generated",
    "open_period": "Open period: data up to {until}.",
    "page_of": "Page {number} of {total}",
    "summary": "Summary",
    "no_data": "No data for this period.",
    "kind": "Meter kind",
    "unit": "Unit",
    "devices": "Devices",
    "devices_with_data": "With data",
    "consumption": "Consumption",
    "readings": "Readings",
    "previous": "Previous period",
    "previous_month": "Previous month",
    "previous_week": "Previous week",
    "change": "Change",
    "hours": "Hours with data",
    "expected_hours": "Hours in period",
    "hours_of_period": "Hours with data / in period",
    "completeness": "Completeness",
    "completeness_of_hours": "Completeness (% of hours)",
    "days_with_data": "Days with data",
    "counter_resets": "Counter resets",
    "daily": "Daily consumption",
    "daily_chart": "Daily consumption ({unit})",
    "device_chart": "Largest consumers ({unit})",
    "top": "Top consumers",
    "device_table": "Devices: consumption, comparison and completeness",
    "comparison": "Comparison",
    "rank": "Rank",
    "share": "Share",
    "device": "Device",
    "mac": "MAC",
    "status": "Status",
    "day": "Day",
    "alerts": "Alerts and dead letters",
    "alerts_none": "No alerting data is available for this tenant yet.",
    "alerts_unknown": "The alerts table exists but has no column this report knows how to read.",
    "alerts_count": "Alerts in the period",
    "dead_letters": "Refused messages (dead letters) in the period",
    "dead_letters_none": "No message of this tenant was refused in the period.",
    "reason": "Reason",
    "count": "Count",
    "total": "Total",
    "sheet_summary": "Summary",
    "sheet_devices": "Devices",
    "sheet_daily": "Daily",
    "sheet_comparison": "Comparison",
    "sheet_device_days": "Device days",
    "kind_energy": "Energy",
    "kind_water": "Water",
    "kind_gas": "Gas",
    "status_active": "active",
    "status_inactive": "inactive",
    "status_decommissioned": "decommissioned",
    "period_month": "{month}",
    "period_week": "Week {week} of {year} ({first} to {last})",
    "period_range": "{first} to {last}",
    "completeness_note": (
        "Completeness: hours with at least one reading of a consumption register, out of the "
        "hours of the period (up to the generation time for an open period)."
    ),
    "hours_note": (
        "Hours with data: hours with at least one reading, summed over the devices of the kind, "
        "out of the hours of the period times the number of devices; completeness is the ratio "
        "of the two."
    ),
    "change_note": "Change: against the same device's consumption in the {previous}.",
    "previous_lower_month": "previous month",
    "previous_lower_week": "previous week",
    "previous_lower_range": "period of the same length just before",
    "more_devices": "{count} more devices in the table below.",
}

_WORDS_PT = {
    "title": "Relatório de consumo",
    "tenant": "Cliente",
    "period": "Período",
    "timezone": "Fuso horário",
    "generated": "Gerado em",
    "open_period": "Período em aberto: dados até {until}.",
    "page_of": "Página {number} de {total}",
    "summary": "Resumo",
    "no_data": "Sem dados neste período.",
    "kind": "Tipo de medidor",
    "unit": "Unidade",
    "devices": "Dispositivos",
    "devices_with_data": "Com dados",
    "consumption": "Consumo",
    "readings": "Leituras",
    "previous": "Período anterior",
    "previous_month": "Mês anterior",
    "previous_week": "Semana anterior",
    "change": "Variação",
    "hours": "Horas com dados",
    "expected_hours": "Horas no período",
    "hours_of_period": "Horas com dados / no período",
    "completeness": "Completude",
    "completeness_of_hours": "Completude (% das horas)",
    "days_with_data": "Dias com dados",
    "counter_resets": "Reinícios do contador",
    "daily": "Consumo diário",
    "daily_chart": "Consumo diário ({unit})",
    "device_chart": "Maiores consumidores ({unit})",
    "top": "Maiores consumidores",
    "device_table": "Dispositivos: consumo, comparação e completude",
    "comparison": "Comparação",
    "rank": "Posição",
    "share": "Participação",
    "device": "Dispositivo",
    "mac": "MAC",
    "status": "Situação",
    "day": "Dia",
    "alerts": "Alertas e mensagens recusadas",
    "alerts_none": "Ainda não há dados de alertas para este cliente.",
    "alerts_unknown": "A tabela de alertas existe, mas sem colunas que este relatório saiba ler.",
    "alerts_count": "Alertas no período",
    "dead_letters": "Mensagens recusadas (dead letters) no período",
    "dead_letters_none": "Nenhuma mensagem deste cliente foi recusada no período.",
    "reason": "Motivo",
    "count": "Quantidade",
    "total": "Total",
    "sheet_summary": "Resumo",
    "sheet_devices": "Dispositivos",
    "sheet_daily": "Diário",
    "sheet_comparison": "Comparação",
    "sheet_device_days": "Dias por dispositivo",
    "kind_energy": "Energia",
    "kind_water": "Água",
    "kind_gas": "Gás",
    "status_active": "ativo",
    "status_inactive": "inativo",
    "status_decommissioned": "desativado",
    "period_month": "{month}",
    "period_week": "Semana {week} de {year} ({first} a {last})",
    "period_range": "{first} a {last}",
    "completeness_note": (
        "Completude: horas com pelo menos uma leitura de um registrador de consumo, sobre as "
        "horas do período (até o momento da geração, num período em aberto)."
    ),
    "hours_note": (
        "Horas com dados: horas com pelo menos uma leitura, somadas sobre os dispositivos do "
        "tipo, de um total de horas do período vezes o número de dispositivos; a completude é a "
        "razão entre as duas."
    ),
    "change_note": "Variação: em relação ao consumo do mesmo dispositivo no {previous}.",
    "previous_lower_month": "mês anterior",
    "previous_lower_week": "semana anterior",
    "previous_lower_range": "período de mesma duração imediatamente anterior",
    "more_devices": "Mais {count} dispositivos na tabela abaixo.",
}

_LABELS = {
    "en": Labels("en", ".", ",", "%Y-%m-%d", "yyyy-mm-dd", _EN_MONTHS, _WORDS_EN),
    "pt_BR": Labels("pt_BR", ",", ".", "%d/%m/%Y", "dd/mm/yyyy", _PT_MONTHS, _WORDS_PT),
}


def labels_for(locale: str) -> Labels:
    """The labels of a tenant locale; ValueError for one the reports do not speak."""
    try:
        return _LABELS[locale]
    except KeyError:
        raise ValueError(f"no report labels for locale {locale!r}") from None


def parse_number(text: str, labels: Labels) -> float:
    """The inverse of ``Labels.number`` (for reading a report back)."""
    return float(text.replace(labels.thousands, "").replace(labels.decimal, "."))
